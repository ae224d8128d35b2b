"""The site: the strict offline build (:mod:`.build`), the mkdocs hooks and macros (:mod:`.hooks`) and the
questions log's checks (:mod:`.questions`)."""
