"""Knowledge-guided prompting (Med-PaLM style) and its evaluation harness."""
