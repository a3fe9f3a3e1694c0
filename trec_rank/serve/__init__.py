"""`trec-rank serve`: an exported artifact (`trec_rank.export`) behind HTTP JSON, micro-batched.

rows.py turns request rows into the Arrow table training reads and then into a Batch (the training
conversion itself); batcher.py merges concurrent requests into model calls on one thread; app.py is the
FastAPI app (/predict, /health, /metadata); cli.py starts it under uvicorn. docs/serving.md has the protocol.
"""
