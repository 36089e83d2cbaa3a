"""mc-pipeline: Mailchimp audiences into Ometria, as dynamically partitioned Dagster assets."""
