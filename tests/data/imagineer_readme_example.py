import requests
import time

# Submit generation job
response = requests.post('http://localhost:5000/api/generate', json={
    'prompt': 'a dog jumping over a candle',
    'seed': 42,
    'steps': 30
})

job = response.json()
print(f"Job {job['id']} submitted, position: {job['queue_position']}")

# Poll for completion
job_id = job['id']
while True:
    status_response = requests.get(f'http://localhost:5000/api/jobs/{job_id}')
    job_status = status_response.json()

    if job_status['status'] == 'completed':
        print(f"Job completed! Output: {job_status['output_path']}")
        break
    elif job_status['status'] == 'failed':
        print(f"Job failed: {job_status['error']}")
        break
    elif job_status['status'] == 'cancelled':
        print("Job was cancelled")
        break
    else:
        print(f"Status: {job_status['status']}, position: {job_status.get('queue_position', 'N/A')}")
        time.sleep(2)
