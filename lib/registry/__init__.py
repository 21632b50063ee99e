"""Model registry (operations): gated, atomic, verified publish and pull of run folders, on S3 or a local folder.

storage.py   where versions live: layout names, local-folder and S3 backends
gate.py      the publish gate on the served model's own metrics (metrics.json["served"])
card.py      the model card written next to each version
publish.py   publish a run folder as a new immutable version (imported by the publish stage)
pull.py      list, show and pull verified versions into the local cache (imported by the dashboard and batch)
__main__.py  the CLI: python -m lib.registry list|show|pull
"""
