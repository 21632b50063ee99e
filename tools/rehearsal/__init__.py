"""The offline rehearsal (operations): the real profile through every stage at full size, without the Hub or AWS.

runner.py     the steps, their measurements and the report (`python -m tools.rehearsal`, `make rehearsal`)
hub_cache.py  Hugging Face model and dataset caches built locally, in the layout the Hub clients read offline
fake_s3.py    moto's S3 server on loopback with fake credentials (the tests use it too)
"""
