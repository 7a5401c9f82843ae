"""The multimodal captioner: `from mm import Captioner`."""


def __getattr__(name):
    # Imported on first use, so `import mm.config` stays light.
    if name == "Captioner":
        from mm.captioner import Captioner

        return Captioner
    raise AttributeError(f"module 'mm' has no attribute {name!r}")


__all__ = ["Captioner"]
