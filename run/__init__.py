"""The run machinery: command lines and error lines, distill.py's options, checkpoints and resume, final files, data batches, multi-GPU, monitoring."""
