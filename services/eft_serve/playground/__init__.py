"""The playground: one static page (HTML, three scripts and a style sheet, shipped as package
data) at `/playground` on the HTTP port, beside the OpenAI-compatible routes it calls. `routes`
mounts it."""
