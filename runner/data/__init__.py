"""Data, shared by the driver and the ranks.

Driver side: `sources` (raw data sets from the hub or local files), `rows` (one row -> prompt/chosen/rejected/target
as the data set's YAML maps it), `kinds` (tokenising per kind of rows), `prepare` (slices, blends, the cache).
Rank side: `batches` (which samples each rank takes, data position, padding, collators) and `prepare.load_prepared`.
"""
