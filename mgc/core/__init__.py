"""What every layer of mgc stands on: the error type, the checkpoint format and where checkpoints come from,
the text-document format, and the choice of device. Nothing here imports the rest of mgc."""
