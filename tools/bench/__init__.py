"""Benchmarks (operations): cpu.py, the serving and evaluation benchmark behind `make bench` (`python -m tools.bench`);
gpu.py, training and evaluation throughput on a CUDA machine (`python -m tools.bench.gpu`)."""
