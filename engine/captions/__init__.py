"""SID captions: the rules, the vision-language backends, the captioner."""
