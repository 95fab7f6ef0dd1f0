"""Driver and worker core: submission, ownership, references, execution."""
