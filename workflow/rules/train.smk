rule train:
    input:
        collection=COLLECTION,
        embeddings=GENE_EMBEDDINGS,
        positions=GENE_POSITIONS,
        configs=config["train"]["configs"],
    output:
        checkpoint=CHECKPOINT,
        summary=TRAIN_SUMMARY,
    log:
        "logs/train/train.log",
    conda:
        "../../envs/train.yaml"
    threads: 4
    params:
        run=RUN,
        args=train_args(),
    shell:
        "python -m scprint train-run --run {params.run} --collection {input.collection}"
        " --gene-embeddings {input.embeddings} --gene-positions {input.positions}"
        " --checkpoint-dir checkpoints/{params.run} --summary {output.summary}"
        " {params.args} > {log} 2>&1"
