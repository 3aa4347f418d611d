// Submit generation job
const response = await fetch('http://localhost:5000/api/generate', {
  method: 'POST',
  headers: {'Content-Type': 'application/json'},
  body: JSON.stringify({
    prompt: 'a cute cat',
    seed: 42,
    steps: 30
  })
});

const job = await response.json();
console.log(`Job ${job.id} submitted, position: ${job.queue_position}`);

// Poll for completion
const pollJob = async (jobId) => {
  const statusResponse = await fetch(`http://localhost:5000/api/jobs/${jobId}`);
  const jobStatus = await statusResponse.json();

  if (jobStatus.status === 'completed') {
    console.log(`Image ready: ${jobStatus.output_path}`);
  } else if (jobStatus.status === 'failed') {
    console.error(`Job failed: ${jobStatus.error}`);
  } else if (jobStatus.status === 'cancelled') {
    console.log('Job was cancelled');
  } else {
    console.log(`Status: ${jobStatus.status}, position: ${jobStatus.queue_position || 'N/A'}`);
    setTimeout(() => pollJob(jobId), 2000);
  }
};

pollJob(job.id);
