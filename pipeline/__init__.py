"""Ray Data jobs that run the preprocess operators at scale and write WebDataset shards."""
