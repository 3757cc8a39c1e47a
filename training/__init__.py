"""FlexSR training: fine-tuning command line, data, degradations, losses, loop and evaluation."""
