"""The hardening matrix (issue 12): which tests try which kind of thing a user can really do wrong.
conftest.py marks these tests `hardening` (run them alone: `pytest -m hardening`); a test in
test_hardening.py checks that every entry names a test that exists. README quotes the counts."""

MATRIX = {
    "wrong data on a socket": ["test_hardening.py::test_wrong_socket_data_is_named",
                               "test_concepts.py::test_concept_node_rejects_bad_input"],
    "empty batches": ["test_hardening.py::test_empty_batches_are_named"],
    "mismatched sizes and counts, bad settings": [
        "test_crf.py::test_bad_input_names_the_input", "test_metrics.py::test_bad_inputs_are_named",
        "test_metrics.py::test_mask_iou_known_answers_and_errors", "test_augment.py::test_bad_inputs_are_named",
        "test_clif.py::test_bad_inputs_are_named", "test_lora.py::test_bad_settings_name_the_input",
        "test_lora.py::test_unknown_config_keys_are_refused", "test_em.py::test_concept_lines_and_their_messages",
        "test_vlm.py::test_bad_settings_are_named", "test_cli.py::test_smoke_job_with_real_photos_and_a_bad_token",
        "test_concepts.py::test_one_concept_from_folder_and_one_spec_parser_for_every_caller",
        "test_presets.py::test_unknown_preset_is_refused_with_the_choices",
        "test_captions_cmd.py::test_bad_input_exit_2_and_the_module_entry_point",
        "test_memory_plan.py::test_check_fits_refuses_with_a_sentence_naming_the_settings",
        "test_handoff.py::test_apply_refuses_an_untrained_model_and_another_family",
        "test_buckets_train.py::test_unknown_aspect_is_refused_with_the_choices",
        "test_demo.py::test_bad_demo_settings_are_refused_with_sentences",
        "test_demo.py::test_bad_flags_and_job_files_give_sentences",
        "test_node_context.py::test_an_error_deep_in_the_engine_names_the_running_node"],
    "missing, damaged, wrong-family or pickled model files": [
        "test_models.py::test_other_families_and_parts_are_named",
        "test_models.py::test_ckpt_with_pickled_code_is_refused_not_run",
        "test_sam.py::test_missing_damaged_and_wrong_files", "test_sam.py::test_clip_loader_files_and_messages",
        "test_metrics.py::test_dino_loader_features_and_messages",
        "test_handoff.py::test_unsupported_families_are_named",
        "test_sdxl.py::test_refiner_inpainting_and_partial_files_are_refused_with_a_sentence"],
    "read-only output folder, full disk": [
        "test_lora.py::test_unwritable_output_folder_is_a_clear_error",
        "test_lora.py::test_disk_full_during_export_loses_nothing_and_a_rerun_finishes",
        "test_host.py::test_disk_full_gives_a_sentence_and_no_partial_file",
        "test_host.py::test_atomic_write_leaves_nothing_on_failure",
        "test_concepts.py::test_interrupted_save_is_not_read_as_complete",
        "test_full_disk.py::test_concept_set_save", "test_full_disk.py::test_augmented_dataset",
        "test_full_disk.py::test_evaluation_report"],
    "Cancel at every stage": [
        "test_cancel_matrix.py::test_cancel_mid_stage_leaves_nothing_and_the_rerun_matches",
        "test_augment.py::test_cancel_then_resume_equals_uninterrupted_run",
        "test_augment.py::test_bank_generation_is_cached_and_resumes",
        "test_vlm.py::test_cancel_stops_waiting_requests", "test_host.py::test_progress_raises_cancelled_after_request",
        "test_em.py::test_cancel_during_a_mask_estimate_stops_at_the_next_timestep_batch"],
    "crash mid-training, then a rerun that ends where an uninterrupted run would": [
        "test_lora.py::test_resume_equals_uninterrupted_run", "test_lora.py::test_resume_refuses_other_settings",
        "test_clif.py::test_tokens_only_resume_equals_uninterrupted_run", "test_em.py::test_resume_equals_uninterrupted_run",
        "test_dataset.py::test_write_resume_and_read", "test_cli.py::test_lora_command_trains_exports_and_resumes",
        "test_loop.py::test_resume_never_unpickles_code_and_keeps_the_unreadable_file",
        "test_buckets_train.py::test_bucketed_resume_equals_uninterrupted_run",
        "test_toyworld.py::test_training_crash_then_rerun_matches_uninterrupted"],
    "secrets and safety": [
        "test_vlm.py::test_node_flags_and_repairs_and_never_leaks_the_key",
        "test_vlm.py::test_key_only_over_https_or_to_this_machine", "test_vlm.py::test_no_key_when_variable_unset",
        "test_sid_comfy.py::test_example_workflow_in_real_comfyui",
        "test_host.py::test_output_names_cannot_escape",
        "test_concepts.py::test_save_refuses_names_outside_the_output_folder"],
    # issue 21 (reliability round)
    "runs that cannot be mixed up (another base model, two runs at once, thread counts)": [
        "test_reliability.py::test_base_model_is_identified_by_content_and_a_resume_on_another_is_refused",
        "test_reliability.py::test_class_images_are_cached_per_base_model",
        "test_reliability.py::test_a_second_run_of_the_same_folder_is_refused_and_a_dead_owner_is_taken_over",
        "test_reliability.py::test_the_lock_is_released_on_every_exit_path",
        "test_reliability.py::test_data_fingerprint_does_not_depend_on_the_thread_count"],
    "wrong types in job files, settings and manifests; odd photos": [
        "test_reliability.py::test_wrong_setting_types_are_named",
        "test_reliability.py::test_settings_are_parsed_by_their_declared_type",
        "test_reliability.py::test_wrong_job_file_types_are_sentences",
        "test_reliability.py::test_config_file_kinds_are_named",
        "test_reliability.py::test_smoke_refuses_a_zero_resolution",
        "test_reliability.py::test_float_steps_train_and_export",
        "test_reliability.py::test_a_too_long_token_or_name_is_refused_before_anything_is_written",
        "test_reliability.py::test_a_concept_set_entry_without_folder_is_a_sentence",
        "test_reliability.py::test_a_corrupt_mask_in_eval_is_a_sentence_and_a_huge_resolution_is_warned",
        "test_reliability.py::test_16_bit_grayscale_and_gif_photos_load_as_they_look"],
    "real full and read-only disks (the libraries failing, not simulated)": [
        "test_full_disk.py::test_a_real_full_disk_gives_a_sentence_and_no_partial_file",
        "test_full_disk.py::test_a_folder_that_becomes_read_only_mid_write_gives_a_sentence"],
    "signals and kills (SIGTERM, a second Ctrl-C, files a kill leaves)": [
        "test_reliability.py::test_sigterm_writes_a_checkpoint_and_a_second_signal_prints_no_traceback",
        "test_reliability.py::test_partial_files_of_a_killed_run_are_cleaned_up",
        "test_reliability.py::test_cancel_is_seen_inside_a_sampling_step"],
}


def entries() -> dict[str, str]:
    """'file.py::test_name' -> its class."""
    return {test: kind for kind, tests in MATRIX.items() for test in tests}
