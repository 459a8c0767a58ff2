"""KServe v2 / Triton protocol pieces: wire-level helpers, tensors, JSON and binary HTTP codecs."""
