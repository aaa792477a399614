"""Corpus encoding, FAISS / MaxSim search and ir-measures evaluation of the students.

  encoders      a student (trained params or an imported directory) encoding text on the local devices
  corpus        resumable chunked corpus embeddings on disk, read back as stores
  faiss_index   FAISS flat and IVF-PQ indexes (GPU when available)
  search        top-k: FAISS for bi-encoders; exact MaxSim or ColBERTv1 (IVF-PQ + MaxSim) for ColBERT
  metrics       ir-measures metrics over all judged queries
  evaluate      the evaluation mode: data, run file, metrics.json
"""
