"""Use lamelm-fast's reporting inside other trainers."""
