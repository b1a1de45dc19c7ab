"""BPF C sources; installed next to their compiled ``*.bpf.o`` objects."""
