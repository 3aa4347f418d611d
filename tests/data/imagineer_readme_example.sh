# Submit job
curl -X POST http://localhost:5000/api/generate \
  -H "Content-Type: application/json" \
  -d '{"prompt":"a beautiful sunset","steps":30}'

# Check queue
curl http://localhost:5000/api/jobs

# Get config
curl http://localhost:5000/api/config
