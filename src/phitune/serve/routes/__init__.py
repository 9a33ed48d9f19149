"""One router per resource of the OpenAI API."""
