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
        "test_vlm.py::test_bad_settings_are_named", "test_cli.py::test_smoke_job_with_real_photos_and_a_bad_token"],
    "missing, damaged, wrong-family or pickled model files": [
        "test_models.py::test_other_families_and_parts_are_named",
        "test_models.py::test_ckpt_with_pickled_code_is_refused_not_run",
        "test_sam.py::test_missing_damaged_and_wrong_files", "test_sam.py::test_clip_loader_files_and_messages",
        "test_metrics.py::test_dino_loader_features_and_messages"],
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
        "test_vlm.py::test_cancel_stops_waiting_requests", "test_host.py::test_progress_raises_cancelled_after_request"],
    "crash mid-training, then a rerun that ends where an uninterrupted run would": [
        "test_lora.py::test_resume_equals_uninterrupted_run", "test_lora.py::test_resume_refuses_other_settings",
        "test_clif.py::test_tokens_only_resume_equals_uninterrupted_run", "test_em.py::test_resume_equals_uninterrupted_run",
        "test_dataset.py::test_write_resume_and_read", "test_cli.py::test_lora_command_trains_exports_and_resumes",
        "test_loop.py::test_resume_never_unpickles_code_and_keeps_the_unreadable_file",
        "test_toyworld.py::test_training_crash_then_rerun_matches_uninterrupted"],
    "secrets and safety": [
        "test_vlm.py::test_node_flags_and_repairs_and_never_leaks_the_key",
        "test_vlm.py::test_key_only_over_https_or_to_this_machine", "test_vlm.py::test_no_key_when_variable_unset",
        "test_sid_comfy.py::test_example_workflow_in_real_comfyui",
        "test_host.py::test_output_names_cannot_escape",
        "test_concepts.py::test_save_refuses_names_outside_the_output_folder"],
}


def entries() -> dict[str, str]:
    """'file.py::test_name' -> its class."""
    return {test: kind for kind, tests in MATRIX.items() for test in tests}
