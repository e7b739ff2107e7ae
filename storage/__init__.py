"""On-disk formats of lateflow: Parquet schemas, atomic writes, manifests and index persistence.

Every file lateflow writes goes through this package, so the formats live in one place.
"""
