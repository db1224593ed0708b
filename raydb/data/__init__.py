"""Subject photos in: ``ingest.py`` (folders or s3://, checked, oriented, resized and cropped) and
``demo_subject.py`` (the built-in demo subject, drawn in code)."""
