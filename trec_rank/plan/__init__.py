"""`trec-rank plan`: what-if sharding plans for any cluster, computed in one process.

planning.py runs the trainer's own planner (same sharders, constraints, optimizer tagging) for a
described cluster; report.py renders its choices; diagnose.py explains a model that does not fit;
fingerprint.py + io.py save a plan as versioned JSON that `trec-rank train --plan` loads.
"""
