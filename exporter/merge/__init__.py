"""`lorax merge`'s engine: plan (pure: what gets folded where), stream (execute it chunk by chunk), api
(`merge_adapter` + MergeOptions, the one entry point), io (row reads, support files), quant4 (the exact
NF4/FP4 round trip training saw).

    lorax merge adapter/ --out merged/
"""
