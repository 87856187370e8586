"""After training: merge (``merge``: a technique's ``Technique.merge`` plus the merge check), quantize
(``quantize``) and export to GGUF (``gguf``)."""
