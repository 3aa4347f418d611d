"""How release-7dabdcc-v4.db and release-7dabdcc-v4-pg.sql were made: with imagineerd at
commit 7dabdcc (schema version 4) on the import path, e.g.

    git worktree add /tmp/v4 7dabdcc
    PYTHONPATH=/tmp/v4 .venv/bin/python tests/data/make-release-7dabdcc-v4.py sqlite release-7dabdcc-v4.db
    createdb v4 && PYTHONPATH=/tmp/v4 .venv/bin/python tests/data/make-release-7dabdcc-v4.py \
        pg postgresql://postgres@127.0.0.1/v4
    pg_dump --inserts --no-owner --no-privileges --no-comments v4   # then drop the \ lines

It queues jobs, runs some to completion and fails some in the store (no model needed),
cancels one, takes an inbox file, leaves one running (as a crash would) and one queued.
"""
import sys
from pathlib import Path
import imagineerd
# The old code, not this checkout: its schema is what the fixture must hold.
from imagineerd import config as config_mod
from imagineerd.jobs import COMPLETED, FAILED, validate
from imagineerd.store import ClaimSubmission, SCHEMA_VERSION

assert SCHEMA_VERSION == 4
T = "2026-03-01T10:00:00.000000"
kind = sys.argv[1]
if kind == "sqlite":
    from imagineerd.sqlite_store import SQLiteStore
    store = SQLiteStore(sys.argv[2])
else:
    from imagineerd.pg_store import PostgresStore
    store = PostgresStore(sys.argv[2])

def spec(prompt, **f):
    return validate({"prompt": prompt, "seed": 7, **f}, config_mod.DEFAULTS["generation"])

done = []
for i in range(3):
    job = store.add(spec(f"a fox {i}", width=512, height=768), submitted_at=T, source="api")
    claimed = store.claim_next(started_at=T, node="gpu-1", lease_seconds=30)
    store.finish(claimed.id, COMPLETED, completed_at=T, duration_seconds=1.5 + i,
                 output_path=f"outputs/20260301_100000_a_fox_{i}_{claimed.id}.png",
                 webhooks=["http://hooks.lan/done"], token=claimed.token)
for i in range(2):
    store.add(spec(f"broken {i}"), submitted_at=T, source="openai")
    claimed = store.claim_next(started_at=T, node="gpu-1")
    store.finish(claimed.id, FAILED, completed_at=T, error="RuntimeError: the backend broke",
                 token=claimed.token)
cancel = store.add(spec("never mind"), submitted_at=T, source="a1111")
store.cancel_queued(cancel.id, completed_at=T)
claim = store.create_claim("prompts.txt", "/srv/inbox/.claimed/1-prompts.txt", created_at=T, node="gpu-1")
store.submit_claims([ClaimSubmission(claim, [spec("from the inbox"), spec("second line")], "prompts.txt",
                    final_path="/srv/inbox/done/prompts.txt")], submitted_at=T, source="inbox")
store.update_claim(claim, "done")
running = store.claim_next(started_at=T, node="gpu-1", lease_seconds=30)  # left running: a crash
store.add(spec("still queued", steps=12), submitted_at=T, source="cli")
store.heartbeat("gpu-1", {"version": imagineerd.__version__, "state": "running", "devices": []})
store.put_setting("queue", {"paused": False, "since": None, "by": None})
store.put_setting("generation", {"steps": 20})
print(store.counts(), running.id)
store.close()
