rule gene_positions:
    output:
        GENE_POSITIONS,
    log:
        "logs/gene_positions/gene_positions.log",
    cache: "omit-software"  # reference data: shared between workflows with --cache
    conda:
        "../../envs/embed.yaml"
    params:
        organisms=organism_args(),
        tolerance=config["gene_positions"]["tolerance"],
    shell:
        "python -m scprint gene-positions {params.organisms} --tolerance {params.tolerance}"
        " --out {output} > {log} 2>&1"


rule tiny_esm:
    output:
        directory(TINY_ESM),
    log:
        "logs/tiny_esm/tiny_esm.log",
    conda:
        "../../envs/embed.yaml"
    shell:
        "python -m scprint tiny-esm --out {output} > {log} 2>&1"


rule gene_embeddings:
    input:
        model=embedding_model_inputs,
        fasta=embedding_fasta_inputs,
    output:
        embeddings=GENE_EMBEDDINGS,
        missing=MISSING_PROTEINS,
    log:
        "logs/gene_embeddings/gene_embeddings.log",
    cache: "omit-software"
    conda:
        "../../envs/embed.yaml"
    threads: 4
    params:
        args=embedding_args(),
    shell:
        "python -m scprint gene-embeddings {params.args} --cache-dir resources/proteins"
        " --out {output.embeddings} --missing-report {output.missing} > {log} 2>&1"
