"""Benchmarks (operations): cpu.py, the serving and evaluation benchmark behind `make bench` (`python -m lib.bench`);
gpu.py, training and evaluation throughput on a CUDA machine (`python -m lib.bench.gpu`)."""
