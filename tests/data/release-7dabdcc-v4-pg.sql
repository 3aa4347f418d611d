-- The job database of imagineerd at commit 7dabdcc (schema version 4) on PostgreSQL 15:
-- the jobs, claim, deliveries, node and settings that release wrote (pg_dump --inserts
-- --no-owner --no-privileges, psql meta-commands and comments left out). Made with the same
-- script as release-7dabdcc-v4.db; tests/test_pg_store.py loads it into a new database.

SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

SET default_tablespace = '';

SET default_table_access_method = heap;

CREATE TABLE public.claims (
    id bigint NOT NULL,
    original text NOT NULL,
    claimed text NOT NULL,
    state text NOT NULL,
    created_at text NOT NULL,
    final_path text,
    note_path text,
    node text
);

CREATE SEQUENCE public.claims_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.claims_id_seq OWNED BY public.claims.id;

CREATE TABLE public.deliveries (
    id bigint NOT NULL,
    job_id bigint NOT NULL,
    event text NOT NULL,
    url text NOT NULL,
    state text NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    created_at double precision NOT NULL,
    next_at double precision NOT NULL,
    last_status integer,
    last_error text,
    delivered_at double precision
);

CREATE SEQUENCE public.deliveries_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.deliveries_id_seq OWNED BY public.deliveries.id;

CREATE TABLE public.events (
    id bigint NOT NULL,
    node text NOT NULL,
    type text NOT NULL,
    data text NOT NULL,
    created_at double precision DEFAULT EXTRACT(epoch FROM clock_timestamp()) NOT NULL
);

CREATE SEQUENCE public.events_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.events_id_seq OWNED BY public.events.id;

CREATE TABLE public.inputs (
    digest text NOT NULL,
    data bytea NOT NULL,
    created_at double precision DEFAULT EXTRACT(epoch FROM clock_timestamp()) NOT NULL
);

CREATE TABLE public.jobs (
    id bigint NOT NULL,
    seq bigint NOT NULL,
    status text NOT NULL,
    spec text NOT NULL,
    source text DEFAULT 'api'::text NOT NULL,
    source_name text,
    submitted_at text NOT NULL,
    started_at text,
    completed_at text,
    duration_seconds double precision,
    output_path text,
    error text,
    attempts integer DEFAULT 0 NOT NULL,
    progress_step integer DEFAULT 0 NOT NULL,
    progress_total integer DEFAULT 0 NOT NULL,
    claim_id bigint,
    node text,
    token text,
    lease_until double precision,
    interrupt text
);

CREATE SEQUENCE public.jobs_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.jobs_id_seq OWNED BY public.jobs.id;

CREATE SEQUENCE public.jobs_queue_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.jobs_queue_seq OWNED BY public.jobs.seq;

CREATE TABLE public.meta (
    key text NOT NULL,
    value text NOT NULL
);

CREATE TABLE public.nodes (
    name text NOT NULL,
    info text NOT NULL,
    started_at double precision NOT NULL,
    heartbeat_at double precision NOT NULL
);

CREATE TABLE public.settings (
    key text NOT NULL,
    value text NOT NULL
);

ALTER TABLE ONLY public.claims ALTER COLUMN id SET DEFAULT nextval('public.claims_id_seq'::regclass);

ALTER TABLE ONLY public.deliveries ALTER COLUMN id SET DEFAULT nextval('public.deliveries_id_seq'::regclass);

ALTER TABLE ONLY public.events ALTER COLUMN id SET DEFAULT nextval('public.events_id_seq'::regclass);

ALTER TABLE ONLY public.jobs ALTER COLUMN id SET DEFAULT nextval('public.jobs_id_seq'::regclass);

ALTER TABLE ONLY public.jobs ALTER COLUMN seq SET DEFAULT nextval('public.jobs_queue_seq'::regclass);

INSERT INTO public.claims VALUES (1, 'prompts.txt', '/srv/inbox/.claimed/1-prompts.txt', 'done', '2026-03-01T10:00:00.000000', '/srv/inbox/done/prompts.txt', NULL, 'gpu-1');

INSERT INTO public.deliveries VALUES (1, 1, 'job.completed', 'http://hooks.lan/done', 'pending', 0, 1796190784.0239754, 1796190784.0239754, NULL, NULL, NULL);
INSERT INTO public.deliveries VALUES (2, 2, 'job.completed', 'http://hooks.lan/done', 'pending', 0, 1796190784.0340288, 1796190784.0340288, NULL, NULL, NULL);
INSERT INTO public.deliveries VALUES (3, 3, 'job.completed', 'http://hooks.lan/done', 'pending', 0, 1796190784.041112, 1796190784.041112, NULL, NULL, NULL);

INSERT INTO public.jobs VALUES (1, 1, 'completed', '{"prompt": "a fox 0", "negative_prompt": "", "seed": 7, "steps": 30, "width": 512, "height": 768, "guidance_scale": 7.5, "scheduler": "euler", "model": "", "loras": [], "clip_skip": 1, "vae": "default", "init_image": "", "init_image_name": "", "strength": 0.75, "mask": "", "mask_blur": 4, "inpaint_area": "whole", "hires": null, "webhook_url": ""}', 'api', NULL, '2026-03-01T10:00:00.000000', '2026-03-01T10:00:00.000000', '2026-03-01T10:00:00.000000', 1.5, 'outputs/20260301_100000_a_fox_0_1.png', NULL, 1, 0, 0, NULL, 'gpu-1', 'b69982b9b6c5818f', NULL, NULL);
INSERT INTO public.jobs VALUES (2, 2, 'completed', '{"prompt": "a fox 1", "negative_prompt": "", "seed": 7, "steps": 30, "width": 512, "height": 768, "guidance_scale": 7.5, "scheduler": "euler", "model": "", "loras": [], "clip_skip": 1, "vae": "default", "init_image": "", "init_image_name": "", "strength": 0.75, "mask": "", "mask_blur": 4, "inpaint_area": "whole", "hires": null, "webhook_url": ""}', 'api', NULL, '2026-03-01T10:00:00.000000', '2026-03-01T10:00:00.000000', '2026-03-01T10:00:00.000000', 2.5, 'outputs/20260301_100000_a_fox_1_2.png', NULL, 1, 0, 0, NULL, 'gpu-1', '4baa6c07a8f8c0b9', NULL, NULL);
INSERT INTO public.jobs VALUES (3, 3, 'completed', '{"prompt": "a fox 2", "negative_prompt": "", "seed": 7, "steps": 30, "width": 512, "height": 768, "guidance_scale": 7.5, "scheduler": "euler", "model": "", "loras": [], "clip_skip": 1, "vae": "default", "init_image": "", "init_image_name": "", "strength": 0.75, "mask": "", "mask_blur": 4, "inpaint_area": "whole", "hires": null, "webhook_url": ""}', 'api', NULL, '2026-03-01T10:00:00.000000', '2026-03-01T10:00:00.000000', '2026-03-01T10:00:00.000000', 3.5, 'outputs/20260301_100000_a_fox_2_3.png', NULL, 1, 0, 0, NULL, 'gpu-1', '639342f2cb0facf7', NULL, NULL);
INSERT INTO public.jobs VALUES (4, 4, 'failed', '{"prompt": "broken 0", "negative_prompt": "", "seed": 7, "steps": 30, "width": 512, "height": 512, "guidance_scale": 7.5, "scheduler": "euler", "model": "", "loras": [], "clip_skip": 1, "vae": "default", "init_image": "", "init_image_name": "", "strength": 0.75, "mask": "", "mask_blur": 4, "inpaint_area": "whole", "hires": null, "webhook_url": ""}', 'openai', NULL, '2026-03-01T10:00:00.000000', '2026-03-01T10:00:00.000000', '2026-03-01T10:00:00.000000', NULL, NULL, 'RuntimeError: the backend broke', 1, 0, 0, NULL, 'gpu-1', '85d35125418a77f3', NULL, NULL);
INSERT INTO public.jobs VALUES (5, 5, 'failed', '{"prompt": "broken 1", "negative_prompt": "", "seed": 7, "steps": 30, "width": 512, "height": 512, "guidance_scale": 7.5, "scheduler": "euler", "model": "", "loras": [], "clip_skip": 1, "vae": "default", "init_image": "", "init_image_name": "", "strength": 0.75, "mask": "", "mask_blur": 4, "inpaint_area": "whole", "hires": null, "webhook_url": ""}', 'openai', NULL, '2026-03-01T10:00:00.000000', '2026-03-01T10:00:00.000000', '2026-03-01T10:00:00.000000', NULL, NULL, 'RuntimeError: the backend broke', 1, 0, 0, NULL, 'gpu-1', 'f5517363a0f53d4a', NULL, NULL);
INSERT INTO public.jobs VALUES (6, 6, 'cancelled', '{"prompt": "never mind", "negative_prompt": "", "seed": 7, "steps": 30, "width": 512, "height": 512, "guidance_scale": 7.5, "scheduler": "euler", "model": "", "loras": [], "clip_skip": 1, "vae": "default", "init_image": "", "init_image_name": "", "strength": 0.75, "mask": "", "mask_blur": 4, "inpaint_area": "whole", "hires": null, "webhook_url": ""}', 'a1111', NULL, '2026-03-01T10:00:00.000000', NULL, '2026-03-01T10:00:00.000000', NULL, NULL, NULL, 0, 0, 0, NULL, NULL, NULL, NULL, NULL);
INSERT INTO public.jobs VALUES (8, 8, 'queued', '{"prompt": "second line", "negative_prompt": "", "seed": 7, "steps": 30, "width": 512, "height": 512, "guidance_scale": 7.5, "scheduler": "euler", "model": "", "loras": [], "clip_skip": 1, "vae": "default", "init_image": "", "init_image_name": "", "strength": 0.75, "mask": "", "mask_blur": 4, "inpaint_area": "whole", "hires": null, "webhook_url": ""}', 'inbox', 'prompts.txt', '2026-03-01T10:00:00.000000', NULL, NULL, NULL, NULL, NULL, 0, 0, 0, 1, NULL, NULL, NULL, NULL);
INSERT INTO public.jobs VALUES (7, 7, 'running', '{"prompt": "from the inbox", "negative_prompt": "", "seed": 7, "steps": 30, "width": 512, "height": 512, "guidance_scale": 7.5, "scheduler": "euler", "model": "", "loras": [], "clip_skip": 1, "vae": "default", "init_image": "", "init_image_name": "", "strength": 0.75, "mask": "", "mask_blur": 4, "inpaint_area": "whole", "hires": null, "webhook_url": ""}', 'inbox', 'prompts.txt', '2026-03-01T10:00:00.000000', '2026-03-01T10:00:00.000000', NULL, NULL, NULL, NULL, 1, 0, 0, 1, 'gpu-1', 'c2198ef9b425f2eb', 1796190814.062822, NULL);
INSERT INTO public.jobs VALUES (9, 9, 'queued', '{"prompt": "still queued", "negative_prompt": "", "seed": 7, "steps": 12, "width": 512, "height": 512, "guidance_scale": 7.5, "scheduler": "euler", "model": "", "loras": [], "clip_skip": 1, "vae": "default", "init_image": "", "init_image_name": "", "strength": 0.75, "mask": "", "mask_blur": 4, "inpaint_area": "whole", "hires": null, "webhook_url": ""}', 'cli', NULL, '2026-03-01T10:00:00.000000', NULL, NULL, NULL, NULL, NULL, 0, 0, 0, NULL, NULL, NULL, NULL, NULL);

INSERT INTO public.meta VALUES ('schema_version', '4');

INSERT INTO public.nodes VALUES ('gpu-1', '{"version": "0.1.0", "state": "running", "devices": []}', 1796190784.067322, 1796190784.067322);

INSERT INTO public.settings VALUES ('queue', '{"paused": false, "since": null, "by": null}');
INSERT INTO public.settings VALUES ('generation', '{"steps": 20}');

SELECT pg_catalog.setval('public.claims_id_seq', 1, true);

SELECT pg_catalog.setval('public.deliveries_id_seq', 3, true);

SELECT pg_catalog.setval('public.events_id_seq', 1, false);

SELECT pg_catalog.setval('public.jobs_id_seq', 9, true);

SELECT pg_catalog.setval('public.jobs_queue_seq', 9, true);

ALTER TABLE ONLY public.claims
    ADD CONSTRAINT claims_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.deliveries
    ADD CONSTRAINT deliveries_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.events
    ADD CONSTRAINT events_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.inputs
    ADD CONSTRAINT inputs_pkey PRIMARY KEY (digest);

ALTER TABLE ONLY public.jobs
    ADD CONSTRAINT jobs_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.meta
    ADD CONSTRAINT meta_pkey PRIMARY KEY (key);

ALTER TABLE ONLY public.nodes
    ADD CONSTRAINT nodes_pkey PRIMARY KEY (name);

ALTER TABLE ONLY public.settings
    ADD CONSTRAINT settings_pkey PRIMARY KEY (key);

CREATE UNIQUE INDEX claims_open_original ON public.claims USING btree (original) WHERE (state = ANY (ARRAY['claiming'::text, 'submitted'::text]));

CREATE INDEX deliveries_due ON public.deliveries USING btree (state, next_at);

CREATE INDEX jobs_claim ON public.jobs USING btree (claim_id) WHERE (claim_id IS NOT NULL);

CREATE INDEX jobs_running_lease ON public.jobs USING btree (lease_until) WHERE (status = 'running'::text);

CREATE INDEX jobs_running_node ON public.jobs USING btree (node, seq) WHERE (status = 'running'::text);

CREATE INDEX jobs_status_id ON public.jobs USING btree (status, id);

CREATE INDEX jobs_status_seq ON public.jobs USING btree (status, seq);

ALTER TABLE ONLY public.deliveries
    ADD CONSTRAINT deliveries_job_id_fkey FOREIGN KEY (job_id) REFERENCES public.jobs(id);

ALTER TABLE ONLY public.jobs
    ADD CONSTRAINT jobs_claim_id_fkey FOREIGN KEY (claim_id) REFERENCES public.claims(id);

