"""`lorax merge`'s engine: the plan and shard loop (plan), its row I/O (io), the exact NF4/FP4 round trip (quant4).

    lorax merge adapter/ --out merged/
"""
