"""The Voila dashboard (operations). It runs in two kinds of process:

server.py    imported by the Voila server process (voila.json names its CappedKernelManager): visitor cap,
             idle-kernel culling
app.py       imported by each kernel, one per visitor (notebooks/dashboard.ipynb calls app.main): loads the
             served model, classifies uploads and URLs, renders the page
uploads.py   imported by each kernel: safe decoding of uploaded bytes and fetching of pasted URLs
settings.py  imported by both: the params file's dashboard section with HAR_* environment variables on top
static/      the page's CSS and JavaScript, read by app.py
"""
