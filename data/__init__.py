"""Dataset adapters: where each dataset lives (Hugging Face Hub repos, local files) and how its records become
documents, conversations or evaluation examples."""
