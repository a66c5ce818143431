rule lamin_instance:
    output:
        LAMIN_INSTANCE,
    params:
        name=config["lamin"]["name"],
        storage=config["lamin"]["storage"],
        db=lamin_db_arg(),
    log:
        "logs/lamin_instance/lamin_instance.log",
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m scprint lamin-init --name {params.name} --storage {params.storage:q}"
        " {params.db} --out {output} > {log} 2>&1"


rule ontologies:
    input:
        LAMIN_INSTANCE,
    output:
        ONTOLOGIES,
    params:
        source=config["ontologies"]["source"],
        organisms=organism_args(),
    log:
        "logs/ontologies/ontologies.log",
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m scprint ontologies --source {params.source} {params.organisms}"
        " --out {output} > {log} 2>&1"
