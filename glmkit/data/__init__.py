"""Pretraining data: corpus preparation (token shards), sample packing and the blank-infilling collator."""
