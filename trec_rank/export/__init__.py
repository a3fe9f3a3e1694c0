"""`trec-rank export`: a ranking checkpoint as a torch.export program that runs without trec_rank (docs/export.md)."""
