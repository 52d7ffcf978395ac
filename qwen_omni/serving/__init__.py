"""HTTP: the OpenAI-compatible server, its wire format, the backends it talks to (a local model behind the batch
scheduler, the same in a child process, or a remote OpenAI-compatible server), and the remote client. Imports
assistant and below."""
