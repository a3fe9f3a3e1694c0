"""Generative retrieval: sequence encoders (HSTU, SASRec) over a sharded item table, full-corpus eval."""
