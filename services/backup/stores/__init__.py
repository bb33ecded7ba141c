"""Where backups are kept and in which format: the object stores (a local directory, S3, the
API's backup locations) and, inside them, the layout, manifest and encryption of a backup."""
