"""`trec-rank compare`: paired bootstrap intervals between runs evaluated on the same split."""
