rule train:
    input:
        collection=COLLECTION,
        embeddings=GENE_EMBEDDINGS,
        positions=GENE_POSITIONS,
        configs=config["train"]["configs"],
        init_from=init_from_inputs,
    output:
        checkpoint=CHECKPOINT,
        summary=TRAIN_SUMMARY,
        metrics=TRAIN_METRICS,
    log:
        "logs/train/train.log",
    conda:
        "../../envs/train.yaml"
    threads: 4
    resources:
        # profiles/slurm sets `launcher` (profiles/slurm/srun-launch: one task per GPU, as
        # Lightning's SLURMEnvironment expects) and mpi="" keeps the Slurm plugin from
        # wrapping the command in a step of its own (the key's presence does; a value,
        # with train.gpu_memory, makes it send --ntasks), so SIGUSR1 before the time limit
        # reaches only the training processes. Both empty elsewhere.
        mpi=train_slurm("mpi"),
        launcher="",
        # the Slurm request from config train.nodes x train.gpus_per_node (+ gpu_model):
        # --nodes, a per-node --gres and one task per GPU (scprint/slurm.py); the same
        # keys give Lightning its num_nodes and devices (train_args)
        nodes=train_slurm("nodes"),
        gpu=train_slurm("gpu"),
        gpu_model=train_slurm("gpu_model"),
        gres=train_slurm("gres"),
        tasks_per_gpu=train_slurm("tasks_per_gpu"),
        tasks=train_slurm("tasks"),
    params:
        run=RUN,
        args=train_args(),
    shell:
        "{resources.launcher} python -m scprint train-run --run {params.run}"
        " --collection {input.collection}"
        " --gene-embeddings {input.embeddings} --gene-positions {input.positions}"
        " --checkpoint-dir checkpoints/{params.run} --summary {output.summary}"
        " --metrics {output.metrics}"
        " {params.args} > {log} 2>&1"
