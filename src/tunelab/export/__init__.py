"""After training: quantize (``quantize``) and export to GGUF (``gguf``). Merging is the technique's own
(``Technique.merge``)."""
