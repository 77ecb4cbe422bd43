"""The project-specific deployment checks behind scripts/check_deploy.py (one module per subject)."""
