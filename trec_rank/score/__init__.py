"""`trec-rank score`: distributed, resumable, exactly-once batch scoring of Parquet with a training checkpoint.

output.py fixes the output layout and schema, model.py loads the checkpoint (unsharded, sharded or int8),
loop.py scores parts, job.py ties them together under torchrun, cli.py is the argparse front end.
"""
