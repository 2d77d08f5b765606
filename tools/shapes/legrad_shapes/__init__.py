"""Generated shape scenes, and a small OpenCLIP model trained on them (the embedded default)."""
