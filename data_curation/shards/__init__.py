"""WebDataset shards: plan, write, index, verify and read them (local or s3://).

Modules, one job each: ``plan`` (which sample goes to which shard), ``encode`` (the image
bytes a sample stores), ``members`` (the tar layout), ``writer`` (making shards, keeping
intact ones), ``index`` (records, index.parquet, shards.json), ``verify`` (re-reading shards
against the index), ``order`` (epoch order and rank/worker split), ``reader`` (the streaming
dataset), ``gopen`` (webdataset's s3:// opener).
"""
