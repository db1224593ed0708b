"""Subject photos in: ``ingest.py`` (folders or s3://, checked, oriented, resized and cropped) and
``demo_subject.py`` (the built-in demo subject, drawn in code) and ``digits.py`` (scikit-learn's real
handwritten digits: the digits model's data and the built-in subject ``builtin:red-three``)."""
