"""Trainings submitted over HTTP (``/v1/trainings``), each run as a Ray job; no HTTP in here.

``validate`` (the checks of a submission, before anything is written), ``photo_uris`` (photos named
by ``s3://`` URI: which a tenant may name, read under the upload limits), ``store`` (training
records in the workspace: the service's only state), ``queue`` (which trainings run as Ray jobs now,
through the Jobs API), ``job`` (a training job's entrypoint: the pipeline's stages for one stored
training) and ``service`` (the operations the ingress's routes in
:mod:`raydb.serving.training_routes` call). See docs/service.md.
"""
