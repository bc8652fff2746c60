"""The run machinery: the run around Algorithm 1 (training.Run), command lines and error lines, distill.py's options, checkpoints and resume, final files, data batches, multi-GPU, monitoring."""
